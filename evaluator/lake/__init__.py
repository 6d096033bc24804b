"""The evaluator's partitioned columnar landing zone (Parquet, hive layout); see layout.py."""
