"""The dataplane role: a DNS resolver beside each workload, fed by its zone control plane.

C{table} holds the mesh's names as the zone sends them (and keeps them on disk),
C{client} is the sync handler that receives them, C{resolver} and C{forwarder}
answer and forward queries, C{service} assembles them into the twistd service,
and C{tproxy} writes the transparent-proxy DNS rules.
"""
