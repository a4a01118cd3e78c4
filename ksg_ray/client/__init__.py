"""CLIENT SIDE — the only code that reads private records: DP configs, the privacy engine (DP-SGD, accountant,
ledger), the DP trainer, the reward model's candidate answers and canaries. What leaves goes through
`ksg_ray.bundle`."""
