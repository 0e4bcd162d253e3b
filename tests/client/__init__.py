"""Tests of the pycontainerd.client SDK."""
