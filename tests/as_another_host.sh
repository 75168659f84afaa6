#!/bin/sh
# A stand-in for ssh that hydra's mpiexec can use as its launcher (-launcher ssh -launcher-exec THIS):
# "ssh [options] HOST COMMAND" runs COMMAND on this machine in a new UTS namespace whose host name is
# HOST. MPICH then places that rank on another node and llama-mpi sees another host, so the multi-host
# paths run without a second machine; UCX still moves the bytes through shared memory (same machine: for
# a real network link see tests/in_netns.sh). Tests only; needs `unshare --uts` (root, or user namespaces).
while [ "${1#-}" != "$1" ]; do shift; done
host="$1"; shift
exec unshare --uts sh -c "hostname '$host' && exec sh -c \"\$0\"" "$*"
