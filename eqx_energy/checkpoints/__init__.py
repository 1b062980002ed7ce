"""Checkpoints: openpi parameter directories (`openpi`)."""
