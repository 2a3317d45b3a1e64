"""Tests that boot a qemu guest (vm marker)."""
