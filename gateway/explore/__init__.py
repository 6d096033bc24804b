"""Exploration: which arm serves a request (policies, Thompson maths) and the rewards that
move it."""
