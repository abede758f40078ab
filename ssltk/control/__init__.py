"""Noise controls: can a pretext task be solved without image content? (``ssltk control``)"""
