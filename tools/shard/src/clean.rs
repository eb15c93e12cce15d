//! Cleaning at write time: decide what an input file really is from its bytes (never its name) and turn it
//! into something every JPEG reader handles: a baseline-decodable JPEG in YCbCr or grayscale.
//!
//! - A YCbCr, RGB or grayscale JPEG that decodes and ends with an EOI marker is kept byte for byte
//!   (grayscale stays grayscale: the loader expands it, as PIL's `convert("RGB")` does).
//! - A CMYK or YCCK JPEG becomes RGB. An Adobe APP14 marker means the CMYK values are stored inverted (the
//!   Photoshop convention that libjpeg, PIL and browsers follow); without one they are plain ink amounts.
//!   RGB = (255 − C)(255 − K)/255 per channel on the plain amounts.
//! - Any other format the `image` crate reads (PNG named `.JPEG`, GIF, BMP, WebP, TIFF) is re-encoded
//!   as JPEG.
//! - Empty, truncated and unreadable files are refused with a reason (an [`Error::Image`] without a path:
//!   these functions see bytes, not files); the packer names the file, then records and skips it.

use image::{DynamicImage, ImageFormat};
use zune_jpeg::JpegDecoder;
use zune_jpeg::zune_core::colorspace::ColorSpace;
use zune_jpeg::zune_core::options::DecoderOptions;

use crate::error::{Error, Result};

/// The largest side we accept (JPEG's own limit is 65535); larger inputs are refused, not truncated.
const MAX_SIDE: usize = 65_535;

#[derive(Clone, Copy, Debug)]
pub struct CleanOptions {
    /// Re-encode quality for images that must be re-encoded.
    pub quality: u8,
    /// Cap on the long side; larger images are resized (bicubic, antialiased) and re-encoded.
    pub max_side: Option<u32>,
}

/// A cleaned image, ready to be written as `{key}.jpg`.
#[derive(Debug)]
pub struct Cleaned {
    pub jpeg: Vec<u8>,
    pub width: u32,
    pub height: u32,
    /// 1 (grayscale) or 3.
    pub channels: u8,
    /// What was done, in order; empty when the original bytes were kept.
    pub cleaning: Vec<String>,
}

/// What the JPEG markers say, read without decoding the entropy-coded data.
#[derive(Debug, PartialEq)]
pub struct JpegHeader {
    pub width: u32,
    pub height: u32,
    pub components: u8,
    /// The colour transform byte of an Adobe APP14 segment, if one is present.
    pub adobe_transform: Option<u8>,
    /// An EOI marker follows the first scan: the file is not cut short.
    pub complete: bool,
}

/// Walks the marker segments of a JPEG up to its first scan.
pub fn parse_jpeg_header(b: &[u8]) -> Result<JpegHeader> {
    if b.len() < 4 || b[0] != 0xFF || b[1] != 0xD8 {
        return Err(Error::image("not a JPEG (no SOI marker)"));
    }
    let (mut sof, mut adobe) = (None, None);
    let mut pos = 2;
    loop {
        // Markers may be preceded by any number of 0xFF fill bytes.
        while pos < b.len() && b[pos] == 0xFF {
            pos += 1;
        }
        let Some(&marker) = b.get(pos) else {
            return Err(Error::image("truncated before the first scan"));
        };
        if b[pos - 1] != 0xFF {
            return Err(Error::image(format!("corrupt marker structure at byte {pos}")));
        }
        pos += 1;
        if marker == 0x01 || (0xD0..=0xD7).contains(&marker) {
            continue; // standalone markers carry no length
        }
        if marker == 0xD9 {
            return Err(Error::image("EOI before any scan"));
        }
        let len = match b.get(pos..pos + 2) {
            Some(l) => u16::from_be_bytes([l[0], l[1]]) as usize,
            None => return Err(Error::image("truncated inside a marker segment")),
        };
        if len < 2 || pos + len > b.len() {
            return Err(Error::image("truncated inside a marker segment"));
        }
        let seg = &b[pos + 2..pos + len];
        match marker {
            // SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC).
            0xC0..=0xCF if !matches!(marker, 0xC4 | 0xC8 | 0xCC) => {
                if seg.len() < 6 {
                    return Err(Error::image("short SOF segment"));
                }
                let height = u16::from_be_bytes([seg[1], seg[2]]) as u32;
                let width = u16::from_be_bytes([seg[3], seg[4]]) as u32;
                sof = Some((width, height, seg[5]));
            }
            0xEE if seg.len() >= 12 && &seg[..5] == b"Adobe" => adobe = Some(seg[11]),
            0xDA => {
                let (width, height, components) =
                    sof.ok_or_else(|| Error::image("scan before any frame header"))?;
                if width == 0 || height == 0 {
                    return Err(Error::image(format!("zero-sized frame {width}x{height}")));
                }
                // In entropy-coded data 0xFF is always stuffed (FF 00) or a restart marker, so the first
                // FF D9 after the scan header is the real end of image (a thumbnail's EOI sits in APP1,
                // before this point).
                let complete = b[pos + len..].windows(2).any(|w| w == [0xFF, 0xD9]);
                return Ok(JpegHeader { width, height, components, adobe_transform: adobe, complete });
            }
            _ => {}
        }
        pos += len;
    }
}

fn zune_decode(bytes: &[u8], out: ColorSpace) -> Result<Vec<u8>> {
    let options = DecoderOptions::default()
        .set_max_width(MAX_SIDE)
        .set_max_height(MAX_SIDE)
        .jpeg_set_out_colorspace(out);
    let mut decoder = JpegDecoder::new_with_options(std::io::Cursor::new(bytes), options);
    let pixels = decoder.decode().map_err(|e| Error::image(format!("JPEG decode failed: {e}")))?;
    match decoder.output_colorspace() {
        Some(cs) if cs == out => Ok(pixels),
        got => Err(Error::image(format!("JPEG decoder produced {got:?}, expected {out:?}"))),
    }
}

/// CMYK samples to RGB; `inverted` when stored the Adobe way (255 means no ink).
pub fn cmyk_to_rgb(cmyk: &[u8], inverted: bool) -> Vec<u8> {
    let mul = |a: u8, b: u8| ((a as u32 * b as u32 + 127) / 255) as u8;
    let mut rgb = Vec::with_capacity(cmyk.len() / 4 * 3);
    for px in cmyk.chunks_exact(4) {
        let [c, m, y, k] = [px[0], px[1], px[2], px[3]].map(|v| if inverted { v } else { 255 - v });
        rgb.extend([mul(c, k), mul(m, k), mul(y, k)]);
    }
    rgb
}

/// Encodes 8-bit gray (channels 1) or RGB (channels 3) pixels as a JPEG.
pub fn encode_jpeg(pixels: &[u8], width: u32, height: u32, channels: u8, quality: u8) -> Result<Vec<u8>> {
    let color = if channels == 1 { jpeg_encoder::ColorType::Luma } else { jpeg_encoder::ColorType::Rgb };
    let (w, h) = (u16::try_from(width), u16::try_from(height));
    let (Ok(w), Ok(h)) = (w, h) else {
        return Err(Error::image(format!("{width}x{height} is too large for JPEG")));
    };
    let mut out = Vec::with_capacity(pixels.len() / 8);
    jpeg_encoder::Encoder::new(&mut out, quality)
        .encode(pixels, w, h, color)
        .map_err(|e| Error::image(format!("JPEG encode failed: {e}")))?;
    Ok(out)
}

/// Resizes so the long side is `max_side` (bicubic with antialiasing, as PIL's `resize` does).
fn cap_side(pixels: Vec<u8>, w: u32, h: u32, channels: u8, max_side: u32) -> Result<(Vec<u8>, u32, u32)> {
    use fast_image_resize as fr;
    let scale = max_side as f64 / w.max(h) as f64;
    let (nw, nh) = (((w as f64 * scale).round() as u32).max(1), ((h as f64 * scale).round() as u32).max(1));
    let pt = if channels == 1 { fr::PixelType::U8 } else { fr::PixelType::U8x3 };
    let resize_failed = |e: &dyn std::fmt::Display| Error::image(format!("resize failed: {e}"));
    let src = fr::images::Image::from_vec_u8(w, h, pixels, pt).map_err(|e| resize_failed(&e))?;
    let mut dst = fr::images::Image::new(nw, nh, pt);
    let opts = fr::ResizeOptions::new().resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::CatmullRom));
    fr::Resizer::new().resize(&src, &mut dst, &opts).map_err(|e| resize_failed(&e))?;
    Ok((dst.into_vec(), nw, nh))
}

/// Cleans one input file's bytes. `Err` is the reason it is skipped.
pub fn clean(bytes: &[u8], opts: &CleanOptions) -> Result<Cleaned> {
    if bytes.is_empty() {
        return Err(Error::image("empty file"));
    }
    let mut cleaning = Vec::new();
    let (pixels, width, height, channels) = match image::guess_format(bytes) {
        Ok(ImageFormat::Jpeg) => {
            let hdr = parse_jpeg_header(bytes)?;
            common::files::check_pixels(hdr.width.into(), hdr.height.into()).map_err(Error::image)?;
            if !hdr.complete {
                return Err(Error::image("truncated JPEG (no EOI marker after the scan)"));
            }
            match hdr.components {
                1 | 3 => {
                    let out = if hdr.components == 1 { ColorSpace::Luma } else { ColorSpace::RGB };
                    let pixels = zune_decode(bytes, out)?;
                    let fits = opts.max_side.is_none_or(|m| hdr.width.max(hdr.height) <= m);
                    if fits {
                        return Ok(Cleaned {
                            jpeg: bytes.to_vec(),
                            width: hdr.width,
                            height: hdr.height,
                            channels: hdr.components,
                            cleaning,
                        });
                    }
                    (pixels, hdr.width, hdr.height, hdr.components)
                }
                4 if hdr.adobe_transform == Some(2) => {
                    cleaning.push("ycck_to_rgb".to_string());
                    (zune_decode(bytes, ColorSpace::RGB)?, hdr.width, hdr.height, 3)
                }
                4 => {
                    let inverted = hdr.adobe_transform.is_some();
                    cleaning.push(
                        if inverted { "adobe_inverted_cmyk_to_rgb" } else { "cmyk_to_rgb" }.to_string(),
                    );
                    let cmyk = zune_decode(bytes, ColorSpace::CMYK)?;
                    (cmyk_to_rgb(&cmyk, inverted), hdr.width, hdr.height, 3)
                }
                n => return Err(Error::image(format!("JPEG with {n} components"))),
            }
        }
        Ok(format) => {
            let unreadable = |e: image::ImageError| Error::image(format!("unreadable {format:?}: {e}"));
            let reader = image::ImageReader::with_format(std::io::Cursor::new(bytes), format);
            let (w, h) = reader.into_dimensions().map_err(unreadable)?;
            common::files::check_pixels(w.into(), h.into()).map_err(Error::image)?;
            let img = image::load_from_memory_with_format(bytes, format).map_err(unreadable)?;
            cleaning.push(format!("reencoded_from_{}", format!("{format:?}").to_lowercase()));
            let (w, h) = (img.width(), img.height());
            match img {
                DynamicImage::ImageLuma8(_) | DynamicImage::ImageLuma16(_) => {
                    (img.into_luma8().into_raw(), w, h, 1)
                }
                // Alpha is dropped, as PIL's convert("RGB") does.
                img => (img.into_rgb8().into_raw(), w, h, 3),
            }
        }
        Err(_) => return Err(Error::image("not an image (unknown format)")),
    };
    let (pixels, width, height) = match opts.max_side {
        Some(m) if width.max(height) > m => {
            let (p, nw, nh) = cap_side(pixels, width, height, channels, m)?;
            cleaning.push(format!("resized_{width}x{height}_to_{nw}x{nh}"));
            (p, nw, nh)
        }
        _ => (pixels, width, height),
    };
    let jpeg = encode_jpeg(&pixels, width, height, channels, opts.quality)?;
    Ok(Cleaned { jpeg, width, height, channels, cleaning })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmyk_conversion_follows_the_ink_model() {
        // Plain amounts: cyan ink only is (0, 255, 255); full black is black whatever the rest.
        assert_eq!(cmyk_to_rgb(&[255, 0, 0, 0], false), vec![0, 255, 255]);
        assert_eq!(cmyk_to_rgb(&[0, 0, 0, 255], false), vec![0, 0, 0]);
        assert_eq!(cmyk_to_rgb(&[0, 0, 0, 0], false), vec![255, 255, 255]);
        // Adobe-inverted storage of the same colours.
        assert_eq!(cmyk_to_rgb(&[0, 255, 255, 255], true), vec![0, 255, 255]);
        // Half black on white: (255 - 0)(255 - 128)/255 = 127.
        assert_eq!(cmyk_to_rgb(&[0, 0, 0, 128], false), vec![127, 127, 127]);
    }

    #[test]
    fn header_parser_reads_size_and_rejects_junk() {
        let rgb: Vec<u8> = (0..16 * 8 * 3).map(|i| (i % 251) as u8).collect();
        let jpeg = encode_jpeg(&rgb, 16, 8, 3, 90).unwrap();
        let hdr = parse_jpeg_header(&jpeg).unwrap();
        assert_eq!((hdr.width, hdr.height, hdr.components, hdr.complete), (16, 8, 3, true));
        assert!(!parse_jpeg_header(&jpeg[..jpeg.len() - 2]).unwrap().complete);
        assert!(parse_jpeg_header(b"GIF89a....").is_err());
        assert!(parse_jpeg_header(&jpeg[..20]).is_err());
    }
}
