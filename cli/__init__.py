"""The ``sdlora`` command line (installed as ``sdlora_dist.cli``)."""
