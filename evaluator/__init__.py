"""Understudy evaluator: joins deferred labels to the inference log and decides promotions."""
