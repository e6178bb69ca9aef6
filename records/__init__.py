"""The records format: what prep/build_records.py writes and pipeline/, engine/ and the tools read.

    from records.folder import read_meta, read_stats, shard_paths
    from records.format import DEFAULT_RECORDS
    stats = read_stats(DEFAULT_RECORDS)          # Stats: mean/std in 0-255 levels, cov/eigval in 0-255² (variance units), eigvec
    tars_idxs = shard_paths(DEFAULT_RECORDS, "train")

format.py (the layout's names, RecordsError, the repair command's wording), folder.py (meta.json,
stats.json, the mean image, shard paths, checksums), index.py (a shard's ``.idx`` checked against
its tar, the ``.cls`` label), jpeg.py (a record's JPEG: the header check the Loader runs before
DALI, and the full decode check prep.verify runs).

Layout of OUT:
    meta.json, stats.json, skipped.json, mean_image.npy (float64 256x256x3, 0-255)
    train/shard-000000.tar + .idx, ...   val/shard-000000.tar + .idx, ...
    train.beton, val.beton               (only with --ffcv)
"""
