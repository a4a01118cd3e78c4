"""Where secrets and members may be read (the client or its auditor): utility evaluation, the privacy audit and
the report."""
