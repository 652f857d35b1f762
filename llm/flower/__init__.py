"""Flower apps running the lowrank-fed methods."""
