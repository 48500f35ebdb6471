"""Compiler passes: capture, joint, (cost, symfold, split, wavek): one pass per module."""
