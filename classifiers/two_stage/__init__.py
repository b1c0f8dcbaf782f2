"""The two-stage CNN (Nazeri et al.): patch-wise network, image-wise network, training and CV."""
