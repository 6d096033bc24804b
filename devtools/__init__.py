"""Development tools kept out of the wheel: Monte Carlo simulations and the local Kafka broker."""
