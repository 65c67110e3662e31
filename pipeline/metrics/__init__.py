"""Metric keys are constants: a typo is an import error, not a silently missing column.

``SELECTABLE`` are the names ``--metrics`` takes; ``KEYS`` maps each to the keys it puts in a record.
"""

KEY_FID = "fid"
KEY_IS_MEAN, KEY_IS_STD = "is_mean", "is_std"
KEY_KID_MEAN, KEY_KID_STD = "kid_mean", "kid_std"
KEY_PRECISION, KEY_RECALL = "precision", "recall"
KEY_FD_AUDITOR = "fd_auditor"
KEY_AUDIT = "audit"

FID, IS, KID, PR, FD_AUDITOR, AUDIT = "fid", "is", "kid", "pr", "fd_auditor", "audit"
SELECTABLE = (FID, IS, KID, PR, FD_AUDITOR, AUDIT)
INCEPTION_METRICS = (FID, IS, KID, PR)
AUDITOR_METRICS = (FD_AUDITOR, AUDIT)
KEYS = {FID: (KEY_FID,), IS: (KEY_IS_MEAN, KEY_IS_STD), KID: (KEY_KID_MEAN, KEY_KID_STD),
        PR: (KEY_PRECISION, KEY_RECALL), FD_AUDITOR: (KEY_FD_AUDITOR,), AUDIT: (KEY_AUDIT,)}
