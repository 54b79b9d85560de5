"""What differs between the tasks (classification, segmentation): their models' heads, losses and metrics."""
