"""Adapters: bitrix24"""
