"""The dataplane role: a DNS resolver beside each workload, fed by its zone control plane."""
