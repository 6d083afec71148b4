"""Adapters: vtiger"""
