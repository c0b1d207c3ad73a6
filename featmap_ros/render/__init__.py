"""Headless OpenGL rendering (moderngl + EGL): shared GL helpers, BOP object renderer."""
