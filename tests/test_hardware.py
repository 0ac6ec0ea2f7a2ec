"""Hardware presets: every preset loads, numbers are positive and survive a TOML round trip."""

import pytest

from tiertune.errors import InputError
from tiertune.hardware import GiB, Curve, hardware_presets, load_hardware, profile_from_dict

import tomllib

REQUIRED = {"fuyou-4090-12ssd", "fuyou-4090-1ssd", "lsp-4090", "lsp-a1000-laptop", "lomo-3090", "a100-80g",
            "h100-80g", "megatrain-h200", "gh200"}


def test_the_design_test_beds_are_presets():
    assert REQUIRED <= set(hardware_presets())


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_preset_round_trips_through_toml(name):
    hw = load_hardware(name)
    again = profile_from_dict(tomllib.loads(hw.to_toml()))
    assert again.gpu_mem_bytes == hw.gpu_mem_bytes
    assert again.h2d_bps == pytest.approx(hw.h2d_bps)
    assert again.pcie_efficiency == hw.pcie_efficiency
    assert again.ssd_count == hw.ssd_count


def test_every_preset_number_cites_a_source():
    from tiertune.hardware import PRESET_DIR
    for path in PRESET_DIR.glob("*.toml"):
        for line in path.read_text().splitlines():
            if "_gbps" in line or "memory_gib" in line or "gparams" in line:
                assert "#" in line or "${" in line, f"{path.name}: no source for {line!r}"


def test_fuyou_box_aggregates_twelve_ssds():
    hw = load_hardware("fuyou-4090-12ssd")
    assert hw.ssd_read_total_bps == pytest.approx(12 * 6.5e9)
    assert hw.gpu_mem_bytes == 24 * GiB


def test_calculon_pcie_efficiency_steps():
    c = load_hardware("lsp-4090").pcie_efficiency
    assert c.at(100) == 0.3 and c.at(5e6) == 0.7 and c.at(50e6) == 0.9 and c.at(1e9) == 0.95


def test_gpu_mem_override_and_bad_values():
    hw = load_hardware("lsp-4090").with_gpu_mem(8)
    assert hw.gpu_mem_bytes == 8 * GiB
    with pytest.raises(InputError):
        load_hardware("lsp-4090").with_gpu_mem(-1)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(InputError, match="fuyou-4090-12ssd"):
        load_hardware("dgx-99")


def test_curve_rejects_descending_sizes():
    with pytest.raises(InputError):
        Curve(((10.0, 0.5), (1.0, 0.9)))


def test_malformed_profile_names_the_field(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text(load_hardware("lsp-4090").to_toml().replace("h2d_gbps = ", "h2d_gbps = -", 1))
    with pytest.raises(InputError, match="h2d_gbps"):
        load_hardware(str(p))
