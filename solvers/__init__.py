"""Samplers for score-based diffusion, one signature for all (see ``SAMPLERS``)."""

SAMPLERS: dict = {}
