#!/bin/sh
# A stand-in for ssh that hydra's mpiexec can use as its launcher (-launcher ssh -launcher-exec THIS):
# "ssh [options] HOST COMMAND" runs COMMAND inside the network namespace named HOST (made by
# tests/netns.py), in a new UTS namespace whose host name is HOST. The namespace sees only its end of a
# veth pair and its own /etc/netns/HOST/hosts, so MPI (UCX_TLS=tcp) and hydra's own connections between
# the hosts go over that link. Tests only; needs root.
while [ "${1#-}" != "$1" ]; do shift; done
host="$1"; shift
exec ip netns exec "$host" unshare --uts sh -c "hostname '$host' && exec sh -c \"\$0\"" "$*"
