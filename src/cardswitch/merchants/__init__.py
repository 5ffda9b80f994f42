"""cardswitch.merchants"""
