"""The local document registry stand-in (``passerelle registry``)."""
