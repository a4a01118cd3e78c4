"""The base of the project's own errors: what a user fixes by changing an input, not a bug in ksg-ray.

A config (`KsgConfigError`), a data file (`DataError`), a bundle (`BundleError`), the privacy ledger or budget
(`LedgerError`), a DP plan (`PrivacyPlanError`), a report option (`ReportError`) and a synthesis that wrote too
few rows (`TooFewRows`) each raise a subclass whose message names the file, key or value to fix. `ksg` prints
such an error as one `ksg: error: MESSAGE` line and exits 2, without a traceback (`KSG_DEBUG=1` shows it); any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["KsgError"]


class KsgError(Exception):
    """An error in what the user gave ksg-ray; its message alone tells them what to fix."""
