"""Metric keys are constants: a typo is an import error, not a silently missing column."""

KEY_FID = "fid"
KEY_FD_AUDITOR = "fd_auditor"
KEY_AUDIT = "audit"
