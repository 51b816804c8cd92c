"""Dataset generation, training loops and ensembles (torch; used by ``xrdml train``)."""
