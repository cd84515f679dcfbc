"""Faces, triggers, poisoning and FaceNet fine-tuning: the data/training layer.

Sits above the pure detector (it imports torch, torchvision via facenet-pytorch, PIL) and
below the KFP components; it never imports kfp or mlflow. Nothing here downloads anything:
real data is any ImageFolder/CASIA-layout directory, real weights a local state dict.
"""
