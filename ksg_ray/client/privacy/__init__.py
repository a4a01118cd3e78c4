"""CLIENT SIDE — differential privacy: the DP-SGD step, the accountant, the ledger, and `PrivacyEngine`, the one
object that holds a DP job's privacy state."""
