"""kvpress integration (issue 16): our head scores as a kvpress press. Placeholder."""
