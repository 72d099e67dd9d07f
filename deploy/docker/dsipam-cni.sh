#!/bin/sh
# dsipam-cni: the dsipam CNI IPAM plugin on a node. dsipam-cni-install puts this file in
# the CNI bin directory and the Python runtime it needs in @BUNDLE@ (python/ and site-packages/).
# The runtime calls it with CNI_* variables and the network config on stdin; both pass through.
bundle='@BUNDLE@'
LD_LIBRARY_PATH="$bundle/python/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
PYTHONHOME="$bundle/python"
PYTHONPATH="$bundle/site-packages"
PYTHONNOUSERSITE=1
PYTHONDONTWRITEBYTECODE=1
export LD_LIBRARY_PATH PYTHONHOME PYTHONPATH PYTHONNOUSERSITE PYTHONDONTWRITEBYTECODE
# -S: no site module (about 15 ms per call); PYTHONPATH still applies.
exec "$bundle/python/bin/python3.11" -S -m dsipam.cni "$@"
