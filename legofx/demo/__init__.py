"""The main job, ``legofx demo``: a CNN and its Lego versions trained on real data
(:mod:`legofx.demo.digits`)."""
