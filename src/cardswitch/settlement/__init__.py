"""cardswitch.settlement"""
