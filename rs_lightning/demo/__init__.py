"""`rs demo`: the whole rewarded-soups method on an embedded offline default, stage by stage.

pipeline.py runs stages with reuse (a finished stage is skipped unless --force) and timing; text.py and
captioning.py say what each family trains; report.py prints the table and the trade-off checks.
"""
