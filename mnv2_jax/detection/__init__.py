"""SSD's box machinery, as the TF Object Detection API's SSDLite release defines it: anchors, the box coder, the
IoU matcher with its training targets, hard example mining and the loss, and batched per-class NMS. Pure functions
with static shapes (ground truth padded to a fixed box count with a mask), so all of it runs inside a jitted step.
Boxes are `[ymin, xmin, ymax, xmax]`, normalised to the image (the API's convention) unless a name says pixels.
"""
