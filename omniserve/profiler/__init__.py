"""The profiler: measures the device and the CPU attention pool and fits the scheduler's latency model
(omniserve.engine.scheduler.latency_model) to the measurements."""
