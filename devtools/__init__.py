"""Development tools kept out of the wheel: Monte Carlo simulations, the local Kafka broker and
the helm build for the chart tests."""
