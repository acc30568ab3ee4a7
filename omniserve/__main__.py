from omniserve.entrypoints.cli import main

if __name__ == "__main__":  # spawned CPU attention workers import this module too
    main()
