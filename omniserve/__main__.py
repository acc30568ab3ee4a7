from omniserve.entrypoints.cli import main

main()
