"""Ray job entrypoints (installed as ``memray.jobs``): thin scripts that parse arguments and call
memray, for ``memray submit`` and for plain ``ray job submit``. Inside a Ray job, ``RAY_ADDRESS``
names the cluster, so training joins it instead of starting a local Ray."""
