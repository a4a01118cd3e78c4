"""`ksg pipeline`: every stage in order (client, server, audit), with skip-if-done, rounds and baselines."""
