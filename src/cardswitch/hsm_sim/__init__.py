"""cardswitch.hsm_sim"""
