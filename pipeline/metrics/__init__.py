"""Metric keys are constants: a typo is an import error, not a silently missing column.

``SELECTABLE`` are the names ``--metrics`` takes, ``DEFAULT`` those scored when none are named; ``KEYS``
maps each to the keys it puts in a record.
"""

KEY_FID = "fid"
KEY_IS_MEAN, KEY_IS_STD = "is_mean", "is_std"
KEY_KID_MEAN, KEY_KID_STD = "kid_mean", "kid_std"
KEY_PRECISION, KEY_RECALL = "precision", "recall"
KEY_FD_AUDITOR = "fd_auditor"
KEY_AUDIT = "audit"
KEY_MEMORIZATION = "memorization"
KEY_FD_DINOV2 = "fd_dinov2"
KEY_CLIP_SCORE = "clip_score"
KEY_ALIGNMENT = "alignment"  # CLIPScore per prompt, beside the headline clip_score
KEY_DEMOGRAPHICS = "demographics"
KEY_GENDER_IMBALANCE, KEY_SKIN_TONE_IMBALANCE = "gender_imbalance", "skin_tone_imbalance"
# FD-infinity beside each Fréchet distance: the FD extrapolated to infinitely many samples (unbiased in N)
KEY_FID_INF, KEY_FD_AUDITOR_INF, KEY_FD_DINOV2_INF = "fid_inf", "fd_auditor_inf", "fd_dinov2_inf"

FID, IS, KID, PR, FD_AUDITOR, AUDIT = "fid", "is", "kid", "pr", "fd_auditor", "audit"
MEMORIZATION, FD_DINOV2 = "memorization", "fd_dinov2"
CLIP_SCORE, DEMOGRAPHICS = "clip_score", "demographics"
SELECTABLE = (FID, IS, KID, PR, FD_AUDITOR, AUDIT, MEMORIZATION, FD_DINOV2, CLIP_SCORE, DEMOGRAPHICS)
# metrics of images made from prompts: scored by default for a set `genbench generate` wrote
PROMPT_METRICS = (CLIP_SCORE, DEMOGRAPHICS)
# FD-DINOv2 is asked for by name: a ViT-L/14 at 224 px costs ~30x InceptionV3 per image, hours on a CPU
DEFAULT = tuple(m for m in SELECTABLE if m != FD_DINOV2 and m not in PROMPT_METRICS)
INCEPTION_METRICS = (FID, IS, KID, PR)
AUDITOR_METRICS = (FD_AUDITOR, AUDIT)
KEYS = {FID: (KEY_FID, KEY_FID_INF), IS: (KEY_IS_MEAN, KEY_IS_STD), KID: (KEY_KID_MEAN, KEY_KID_STD),
        PR: (KEY_PRECISION, KEY_RECALL), FD_AUDITOR: (KEY_FD_AUDITOR, KEY_FD_AUDITOR_INF), AUDIT: (KEY_AUDIT,),
        MEMORIZATION: (KEY_MEMORIZATION,), FD_DINOV2: (KEY_FD_DINOV2, KEY_FD_DINOV2_INF),
        CLIP_SCORE: (KEY_CLIP_SCORE, KEY_ALIGNMENT),
        DEMOGRAPHICS: (KEY_DEMOGRAPHICS, KEY_GENDER_IMBALANCE, KEY_SKIN_TONE_IMBALANCE)}
