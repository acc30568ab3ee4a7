"""Scale-out on Ray: several engine instances behind one endpoint (router.py, instances.py). Remote CPU attention
hosts live with the pool they extend (omniserve.cpu_attention.remote)."""
