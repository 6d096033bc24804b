"""Demo: the demo routes' traffic and ground truth, the end-to-end run, and the local-Triton
runner."""

from understudy_demo.traffic import FraudTraffic, PriceTraffic, v2_infer_body

__all__ = ["FraudTraffic", "PriceTraffic", "v2_infer_body"]
