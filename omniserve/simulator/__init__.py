"""The cluster-scale simulator (`omniserve simulate`): the real scheduler, every policy, on a simulated clock, against
a simulated device, CPU attention pool (hosts, workers, network) and PCIe, with measured or analytic profiles.

    profiles.py   hardware and model profiles: measured (`omniserve profile`) or analytic (roofline), and hardware/
    sim.py        the discrete-event simulation of one engine
    workload.py   arrivals and lengths from the shared traces and datasets
    experiment.py one simulated run per policy, the summary, outputs, and the paper preset
    cli.py        the command line
"""
