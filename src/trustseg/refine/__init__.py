"""Training-free refinement of a segmentation: uncertain pixels re-decided from their neighbours, guided
by the image (`propagation`: pure functions; `refiner`: the step a predictor applies)."""
