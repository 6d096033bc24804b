"""The contract between the gateway and the evaluator: the log record schema.

Shared by both programs and importing neither.
"""
