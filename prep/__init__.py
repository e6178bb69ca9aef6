"""Records stage: ImageNet (or the built-in sample set) -> 256x256 DALI-native shards + exact stats.

Entry point: ``python prep/build_records.py`` (see its docstring); the format it writes and its readers: ``records``.
"""
