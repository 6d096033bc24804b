"""Demo ground truth: simulated traffic and labels matching the models in deploy/triton/models."""

from gateway.demo.traffic import FraudTraffic, PriceTraffic, v2_infer_body

__all__ = ["FraudTraffic", "PriceTraffic", "v2_infer_body"]
