"""Adapters: aws"""
